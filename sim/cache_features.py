"""`python -m sim.cache_features vision=... data=frames out=DIR`: the command's contract path (the code
lives in `sim.commands.cache_features`)."""

from sim.commands.cache_features import main

if __name__ == "__main__":
    main()
