"""`python -m sim.export checkpoint=PATH out=DIR`: see sim/export/artifact.py."""

from sim.export.artifact import main

if __name__ == "__main__":
    main()
