"""Train with rlfw: ``accelerate launch recipes/train.py --config configs/quickstart.yaml [--key value ...]``."""

from rlfw.recipe import main

if __name__ == "__main__":
    main()
