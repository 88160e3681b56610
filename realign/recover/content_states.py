"""A model's hidden states at the content positions of the distillation examples, at the held layers: what
`alignment-held` compares the student with (the teacher's states) and counts its ceilings from (the damaged
model's). Neither model changes during a run, so their states are computed once per (model artifact, examples,
layer range) by the DAG's `content_states` step and read by every held run of that damage and teacher, every seed:
the held arm then runs one forward and backward per step, as kd does, instead of two more teacher forwards and a
calibration forward of the damaged model per step (issue 29).

The rows of example i are every content position of it alone (activations.content_positions on the one sequence:
instruction and answer text, never the template, position 0 or the closing EOS), in position order; a training
batch uses a subset of them, since content_token_mask also drops a prefix another row of the batch shares. The
states are computed with the examples right-padded in batches, in eval mode (the models the study targets have no
dropout, so train and eval mode compute the same function), under the training's autocast. Against the states the
student's forward gives the damaged model inside a training batch they differ only in the last bits of GEMMs of
other shapes. Stored as float32 [rows, layers, hidden]: the constraint compares CKA values 0.01 apart.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from realign.identity import layers_label
from realign.data.row_cache import load_row_cache, save_row_cache
from realign.data.sequences import collate
from realign.device import autocast, keep_logits, model_device, on_device
from realign.measure.activations import content_positions
from realign.measure.stage import alignment_range


def n_hidden_states(model) -> int:
    """L + 1: the embeddings and the output of every block (the last one after the final norm)."""
    return int(model.config.num_hidden_layers) + 1


@dataclass
class ContentStates:
    """Per example, its content positions' hidden states at `layers` (indices into hidden_states of a model with
    `n_hidden` of them): `states` [rows, len(layers), hidden], `positions` [rows] (the token position of each row
    within its example) and `offsets` [examples + 1] (example i's rows are offsets[i]:offsets[i + 1])."""
    states: torch.Tensor
    positions: torch.Tensor
    offsets: torch.Tensor
    layers: list[int]
    n_hidden: int

    def select(self, batch: dict, mask: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the [n, hidden] float32 states of the batch's `mask`ed positions ([batch, time] bool, e.g.
        held.content_token_mask), in the row-major order of `hidden_state[mask]`, on the batch's device."""
        rows = []
        for row, example in enumerate(batch["index"].tolist()):
            wanted = torch.nonzero(mask[row]).flatten().cpu()
            start, end = int(self.offsets[example]), int(self.offsets[example + 1])
            stored = self.positions[start:end]
            at = torch.searchsorted(stored, wanted)
            if len(wanted) and (int(at.max()) >= len(stored) or not torch.equal(stored[at], wanted)):
                raise ValueError(f"the content-states cache has no state at positions "
                                 f"{sorted(set(wanted.tolist()) - set(stored.tolist()))} of example {example}: it was "
                                 "made on other examples; delete it and rerun the content_states step")
            rows.append(at + start)
        picked = self.states[torch.cat(rows)].float().to(mask.device)
        return [picked[:, j] for j in range(len(self.layers))]

    def save(self, path: str | Path, examples: list[dict], alignment_layers) -> None:
        save_row_cache({"states": self.states, "positions": self.positions, "offsets": self.offsets}, path, examples,
                       {"layers": ",".join(map(str, self.layers)), "n_hidden": str(self.n_hidden),
                        "alignment_layers": layers_label(alignment_layers)})

    @classmethod
    def load(cls, path: str | Path, examples: list[dict], alignment_layers) -> ContentStates:
        """A cache written by `save` on the same `examples` (fingerprint) and layer range, else a clear error."""
        what = f"content-states cache {path}"
        tensors, metadata = load_row_cache(path, examples, what=what, step="content_states", rows="states",
                                           made_on="other distillation examples (answers, tokenizer or max_len "
                                                   "differ)")
        if metadata.get("alignment_layers") != layers_label(alignment_layers):
            raise ValueError(f"{what} holds the layers {metadata.get('alignment_layers')!r}, the run asks for "
                             f"measure.alignment_layers = {alignment_layers!r}; rerun the content_states step")
        if len(tensors["positions"]) != len(tensors["states"]):
            raise ValueError(f"{what} is inconsistent: {len(tensors['positions'])} positions for "
                             f"{len(tensors['states'])} rows; delete it and rerun the content_states step")
        return cls(tensors["states"], tensors["positions"], tensors["offsets"],
                   [int(v) for v in metadata["layers"].split(",")], int(metadata["n_hidden"]))

    def check_model(self, n_hidden: int, what: str) -> None:
        if n_hidden != self.n_hidden:
            raise ValueError(f"the content-states cache was made on a model with {self.n_hidden} hidden states, "
                             f"{what} has {n_hidden}; rerun the content_states step")


def example_positions(example: dict, index: int) -> list[int]:
    """Every content position of one example alone (the superset of what any training batch selects of it)."""
    try:
        return content_positions([example["input_ids"]], [example["content"]])[0]
    except ValueError as err:
        raise ValueError(f"alignment-held, distillation example {index}: {err}") from None


@torch.no_grad()
def compute_content_states(model, examples: list[dict], alignment_layers, pad_id: int,
                           batch_size: int = 8) -> ContentStates:
    """The states of `model` (left in the mode it came in) at every content position of `examples` (built with
    content flags), at the hidden states alignment_range(alignment_layers) selects."""
    if any("content" not in e for e in examples):
        raise ValueError("content states need examples with content flags (build_examples(content=True))")
    n_hidden = n_hidden_states(model)
    first, last = alignment_range(alignment_layers, n_hidden)
    layers = list(range(first, last + 1))
    positions = [example_positions(e, i) for i, e in enumerate(examples)]
    device, was_training = model_device(model), model.training
    model.eval()
    pieces = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="content states", file=sys.stderr, ascii=True):
            chunk = examples[start:start + batch_size]
            batch = on_device(collate(chunk, pad_id), device)
            with autocast(device):  # the LM head runs on one position: only hidden states are kept
                hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True, **keep_logits(model, 1)).hidden_states
            if len(hidden) != n_hidden:
                raise ValueError(f"the model returned {len(hidden)} hidden states, its config says {n_hidden}")
            for row in range(len(chunk)):
                chosen = positions[start + row]
                pieces.append(torch.stack([hidden[i][row, chosen].float().cpu() for i in layers], dim=1))
    finally:
        model.train(was_training)
    counts = torch.tensor([len(p) for p in positions])
    offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    return ContentStates(torch.cat(pieces), torch.tensor([p for ps in positions for p in ps], dtype=torch.int64),
                         offsets, layers, n_hidden)
