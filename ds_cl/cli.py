"""`ds-cl` command line: one sub-command per module, imported only when used."""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
COMMANDS = {
    "train": ("ds_cl.training.train", "run a continual-learning task sequence from a YAML run config"),
    "demo": ("ds_cl.tools.demo", "run the embedded CPU demo (seqft vs osft)"),
    "benchmark": ("ds_cl.tools.benchmark", "run a task sequence for several methods and seeds; one comparison"),
    "retention": ("ds_cl.tools.retention", "does a method keep instruction following and refusals over a task sequence"),
    "compare": ("ds_cl.tools.compare", "one table and figure comparing finished runs (methods, seeds)"),
    "model": ("ds_cl.tools.models", "materialise a real pretrained model (SmolLM2-135M-Instruct) offline"),
    "update-share": ("ds_cl.tools.update_share", "where an update (aligned - base) lies against osft's first fit"),
    "drift": ("ds_cl.tools.drift", "which parameter groups carried a model's drift from the model it started from"),
    "bench": ("ds_cl.tools.bench", "benchmark plain ZeRO-3 steps against projected steps"),
    "gpu-smoke": ("ds_cl.tools.gpu_smoke", "one short check on a GPU: env, train (osft, resume), bench; JSON per phase"),
    "eval": ("ds_cl.evaluation.cli", "generate responses for a retention suite and score them"),
    "score": ("ds_cl.evaluation.score_cli", "score responses (ifeval|safety|benign), report, split, agreement"),
}


def _usage() -> str:
    lines = ["usage: ds-cl COMMAND [args]   (ds-cl COMMAND --help: its options; ds-cl --version)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before our arguments; ranks read LOCAL_RANK instead.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from ds_cl import __version__

        print(f"ds-cl {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ds-cl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
