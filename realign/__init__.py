"""realign: does self-distillation recover damaged LLMs by re-aligning their hidden-layer geometry?"""

__version__ = "0.1.0"
