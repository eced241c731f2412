"""`python -m sim.stream checkpoint=... video=FILE [telemetry=CSV] out=DIR`: the command's contract path
(the code lives in `sim.export.stream`)."""

from sim.export.stream import StreamRunner, main

__all__ = ["StreamRunner", "main"]

if __name__ == "__main__":
    main()
