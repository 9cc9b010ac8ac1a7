"""Entry point: compose the config, prune, evaluate, log. See README.md for usage."""

from mmprune_exp.run import main

if __name__ == "__main__":
    main()
