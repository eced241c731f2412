"""`python -m sim <command> [overrides]`: every command besides train.py and evaluate.py, by name.

Each command is a Hydra main with its own conf/<config>.yaml, so `--help`, `--cfg job` and overrides
work the same everywhere: `python -m sim synthetic out=data num_train=2048`.
"""

from __future__ import annotations

import importlib
import sys

# name -> the module whose main() runs it
COMMANDS = {
    "synthetic": "sim.data.synthetic",
    "frames": "sim.data.synthetic_frames",
    "cache_features": "sim.commands.cache_features",
    "check_data": "sim.commands.check_data",
    "export": "sim.export.artifact",
    "export_onnx": "sim.export.onnx",
    "bench_latency": "sim.export.latency",
    "stream": "sim.export.stream",
    "ablate": "sim.experiments.ablate",
    "compare": "sim.experiments.compare",
    "bench": "sim.commands.bench",
    "bench_frames": "sim.commands.bench_frames",
    "bench_validation": "sim.commands.bench_validation",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  python -m {module}" for name, module in COMMANDS.items())
    return f"usage: python -m sim COMMAND [key=value ...] [--help] [--cfg job]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 1
    # The command reads its overrides from sys.argv, as when it is run as its own module.
    sys.argv = [f"python -m sim {name}", *rest]
    module = importlib.import_module(COMMANDS[name])
    # A command whose arguments need work before Hydra reads them has a `cli` around its main.
    result = getattr(module, "cli", module.main)()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
