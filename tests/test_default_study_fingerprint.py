"""The default study's real-model fingerprint that a refactor must keep (issue 32).

The restructurings' identity checks ran on the tiny study, a random model; this one runs the real SmolLM2-135M of
`config.yaml`, as its jobs do (realign.models.stage.prepare_teacher, realign.data.stage.prepare_code_corpus,
realign.degrade.stage.degrade), and compares digests recorded from the default study:
- the teacher and the `magnitude-50` and `rtn-w3g64` damages: the `weights_sha256` of the clean-clone run of the
  default study at e845fe7 (docs/2026-12-06-statistics-reanalysis.md), which reproduced the published pages to the
  last digit. Pruning and round-to-nearest are exact, element-wise operations: the same bytes on any CPU.
- the forgetting damage's data: the code corpus the default config cuts from the stdlib, by interpreter (the
  corpus is that interpreter's own source, so another Python is another corpus: its digest is compared where one
  is recorded for the interpreter, and the damage's record must carry the digest of the file it trained on
  everywhere);
- the forgetting damage itself, a 4-step run of `sft-code-lr2e3`'s recipe (the whole 24-step run costs ~2-3 min of
  this suite), at two threads as its job runs: on the recorded interpreter, its training curve within 2e-3 of the
  recorded one on any CPU, and its weights' digest where one is recorded for torch's CPU capability (AVX2, ...). Float reductions run
  on other kernels on another instruction set, and this damage amplifies low-order bits: the whole 24-step run
  gave a damage of 0.379 on the e845fe7 run's machine and about 0.18 on an AVX2-only one (see
  docs/2026-11-30-default-study.md, the note of 2026-12-06); artifacts record the capability
  (`versions.torch_cpu_capability`).
"""

import pytest
import torch
import yaml
from wheels import wheel_root

from realign.config import load_schema, training_params, validate_config
from realign.data.corpora import stdlib_identity
from realign.data.stage import prepare_code_corpus
from realign.degrade.stage import degrade
from realign.io import file_sha256
from realign.models.artifact import read_record
from realign.models.stage import prepare_teacher
from tiny_study import REPO

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m"
TEACHER = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"
DAMAGED = {  # weights_sha256 of the e845fe7 clean-clone run
    "magnitude-50": {"constraint.safetensors": "6a1e897bb5c9946dacf4b2965efc7c657d23899b91396c05391f5413de1682e1",
                     "model.safetensors": "43a3d46ac7e71e4f736bdd9ad1affb812fe906d3aab2e92f6d2181df8ffe8f56"},
    "rtn-w3g64": {"constraint.safetensors": "a5327063c254a3a5714d55d3b49f25b381529d9b2e0fcef717cd150e523206ee",
                  "model.safetensors": "3e3562b9700f9ab28f23ce1a070e1693c20936dce05f8006e3a6f13c9b55cacb"},
}
# code_train.jsonl of the default config, by the interpreter whose stdlib it is cut from
CODE_TRAIN = {
    "Python 3.11.7 (cpython) stdlib at /root/.pyenv/versions/3.11.7/lib/python3.11": "4812eee83ec353cbb7d6fb8d79803ffe572949e7c419f4ed753b71bcbb25e6dc",
}
FORGETTING_STEPS = 4
FORGETTING_CURVE = [2.7593328952789307, 3.0827789306640625, 4.369749546051025, 3.1379005908966064]
FORGETTING = {"AVX2": "f23a199b20846e8b4da8b395890d07da37b8c02b8589d1199df82ce11efb3426"}  # by CPU capability


@pytest.fixture(scope="module")
def default_study(tmp_path_factory):
    config = validate_config(yaml.safe_load((REPO / "config.yaml").read_text()),
                             load_schema(REPO / "workflow/schemas/config.schema.yaml"))
    root = tmp_path_factory.mktemp("default-study")
    spec = config["models"][MODEL]
    teacher = prepare_teacher(MODEL, spec, root / "none", wheel_dir=wheel_root(spec["wheel"]))
    return config, root, teacher


def test_the_teacher_is_the_default_studys(default_study):
    _, _, teacher = default_study
    assert read_record(teacher).weights_sha256 == {"model.safetensors": TEACHER}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_the_pruned_and_quantized_damages_are_the_default_studys_to_the_byte(default_study, name):
    config, root, teacher = default_study
    degrade(teacher, root / name, MODEL, name, training_params(config, "degradations", name), config["seed"])
    assert read_record(root / name).weights_sha256 == DAMAGED[name]


def test_the_forgetting_corpus_and_its_first_steps_are_the_default_studys(default_study):
    config, root, teacher = default_study
    identity = stdlib_identity()
    recorded = identity in CODE_TRAIN  # the stdlib corpus is the interpreter's own source
    train, heldout = root / "code_train.jsonl", root / "code_heldout.jsonl"
    prepare_code_corpus("stdlib", config["data"]["code_heldout_fraction"], config["data"]["narrow_corpus_chars"],
                        train, heldout)
    if recorded:
        assert file_sha256(train) == CODE_TRAIN[identity]
    params = {**training_params(config, "degradations", "sft-code-lr2e3"), "steps": FORGETTING_STEPS}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as its job runs (threads: 2)
    try:
        degrade(teacher, root / "sft-code-lr2e3", MODEL, "sft-code-lr2e3", params, config["seed"], narrow_train=train)
    finally:
        torch.set_num_threads(threads)
    record = read_record(root / "sft-code-lr2e3")
    assert record.data["sha256"] == file_sha256(train)
    capability = record.versions["torch_cpu_capability"]
    assert capability == torch.backends.cpu.get_cpu_capability()
    if not recorded:  # another corpus: its curve and weights are its own (the corpus digest above says which)
        return
    assert [c["loss"] for c in record.training_curve] == pytest.approx(FORGETTING_CURVE, abs=2e-3)
    if capability in FORGETTING:  # bit for bit only on the kernels it was recorded on
        assert record.weights_sha256 == {"model.safetensors": FORGETTING[capability]}
