"""A tiny DeepSeek-V3 built with `transformers` and saved as a checkpoint, for tests/runtime/test_hf*.py.

`get_case(tmp_path_factory, rope)` builds it once per session: random weights
(norms around 1, a nonzero router correction bias), `save_pretrained`, plus
one MTP layer from transformers' `MtpModel` written under the names DeepSeek's
checkpoints use (`model.layers.{L}.enorm`, ... with its embedding and head copies).
The runtime plan it matches is `make_plan(rope)`; its HF config is the one
`hf_config_from_plan` writes, so the logits tests also check that mapping.
"""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from dsvc.runtime.hf import hf_config_from_plan, load_hf_checkpoint
from dsvc.runtime.model import build_full_model
from dsvc.runtime.plan import parse_plan
from dsvc.runtime.tiny import tiny_plan

NUM_LAYERS, SEQ = 3, 40
_CASES: dict[str, HFCase] = {}


def plan_dict(rope: str = "yarn", **mesh) -> dict:
    """The tiny runtime plan (dict form); `yarn`: YaRN active (max_seq_len 64 > original 16),
    `yarn_v2`: the same with DeepSeek-V2's mscale = mscale_all_dim = 0.707 (the softmax scale
    grows by m(0.707)^2, cos/sin stay plain), `plain`: the tiny default, where YaRN is
    inactive (64 <= 4096) and plain RoPE is computed."""
    mesh = {"pp": 1, "dp": 1, "ep": 1, **mesh}
    raw = tiny_plan(**mesh, precision="fp32", num_layers=NUM_LAYERS, mtp_depth=1)
    if rope in ("yarn", "yarn_v2"):
        raw["model"]["rope"].update(original_max_seq=16, factor=4.0)
    if rope == "yarn_v2":
        raw["model"]["rope"].update(mscale=0.707, mscale_all_dim=0.707)
    raw["model"]["init_std"] = 0.1  # larger weights than 0.02: logits and routing far from trivial
    return raw


def make_plan(rope: str = "yarn", **mesh):
    return parse_plan(plan_dict(rope, **mesh))


def _randomize_(model: torch.nn.Module, seed: int, std: float, prefix: str = "") -> None:
    """Weights N(0, std), norm weights around 1, a nonzero router bias (tensors under `prefix`).
    transformers' MtpModel leaves its experts uninitialised, hence every tensor is set here."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not name.startswith(prefix):
                continue
            if "norm" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(std * torch.randn(t.shape, generator=gen))


def _mtp_tensors(mtp, hf, idx: int = NUM_LAYERS) -> dict[str, torch.Tensor]:
    """transformers' MtpModel weights under DeepSeek's checkpoint names (the inverse of
    transformers' MTP renaming: mtp_block.X -> X, post_norm -> shared_head.norm), as
    model.layers.{idx}."""
    out = {}
    for name, t in mtp.state_dict().items():
        if not name.startswith("layers.0."):
            continue  # the shared embedding and head: written as the per-layer copies below
        rest = (
            name[len("layers.0.") :]
            .replace("mtp_block.", "")
            .replace("post_norm.", "shared_head.norm.")
        )
        if rest.endswith("mlp.experts.gate_up_proj"):
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"model.layers.{idx}.mlp.experts.{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"model.layers.{idx}.mlp.experts.{e}.up_proj.weight"] = t[e, inter:].clone()
        elif rest.endswith("mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"model.layers.{idx}.mlp.experts.{e}.down_proj.weight"] = t[e].clone()
        else:
            out[f"model.layers.{idx}.{rest}"] = t.clone()
    out[f"model.layers.{idx}.embed_tokens.weight"] = hf.model.embed_tokens.weight.detach().clone()
    out[f"model.layers.{idx}.shared_head.head.weight"] = hf.lm_head.weight.detach().clone()
    return out


def write_hf_checkpoint(plan, out_dir, std: float):
    """transformers' DeepseekV3 of `plan`'s model (its config from `hf_config_from_plan`) with
    random weights of scale `std`, saved to `out_dir` with one MTP layer under DeepSeek's
    names: -> (the transformers model, its MtpModel), in eval mode."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    cfg = {k: v for k, v in hf_config_from_plan(plan, "float32").items() if k != "dsvc"}
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).eval()
    mtp = MtpModel(hf, 1).eval()
    _randomize_(hf, 1, std)
    _randomize_(mtp, 2, std, prefix="layers.")  # not the embedding and head it shares
    hf.save_pretrained(out_dir)
    weights = load_file(out_dir / "model.safetensors")
    weights.update(_mtp_tensors(mtp, hf, len(plan.model.layers)))
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    return hf, mtp


class HFCase:
    def __init__(self, root, rope: str):
        self.plan = make_plan(rope)
        self.dir = root / f"hf-{rope}"
        self.hf, self.mtp = write_hf_checkpoint(self.plan, self.dir, self.plan.model.init_std)
        gen = torch.Generator().manual_seed(3)
        self.tokens = torch.randint(0, self.plan.model.vocab, (2, SEQ), generator=gen)
        with torch.no_grad():
            out = self.hf(self.tokens, output_hidden_states=True)
        self.logits, self.last_hidden = out.logits, out.hidden_states[-1]

    def copy(self, dst):
        """A private copy of the checkpoint directory, to damage."""
        shutil.copytree(self.dir, dst)
        return dst

    def load(self, path=None, **kw):
        """(a fresh runtime model loaded from `path` (default: the case), the LoadReport)."""
        rt = build_full_model(self.plan)
        report = load_hf_checkpoint(path or self.dir, rt, self.plan, **kw)
        return rt, report


def get_case(tmp_path_factory, rope: str = "yarn") -> HFCase:
    if rope not in _CASES:
        _CASES[rope] = HFCase(tmp_path_factory.getbasetemp() / "hf_cases", rope)
    return _CASES[rope]


def load_and_export(rank: int, scenarios: list[tuple[dict, str]], checkpoint: str) -> list[dict]:
    """On every rank of a spawned job, for each (plan dict, out_dir): build this rank's stages
    as the trainer does, load the checkpoint into them, export them (collectively) to
    out_dir, and report what this rank read."""
    from dsvc.runtime.hf import export_hf_checkpoint
    from dsvc.runtime.trainer import Trainer

    results = []
    for raw, out_dir in scenarios:
        plan = parse_plan(raw)
        trainer = Trainer(plan)
        report = load_hf_checkpoint(checkpoint, trainer.modules, plan)
        export_hf_checkpoint(trainer.modules, plan, out_dir, mesh=trainer.mesh, dtype="fp32")
        mesh = trainer.mesh
        results.append(
            {"loaded": report.loaded, "coords": (mesh.pp_rank, mesh.dp_rank, mesh.ep_rank)}
        )
    return results
