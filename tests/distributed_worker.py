"""Run under torchrun by tests/test_distributed.py: trains each config given as JSON on the command line, in order,
in one process per rank (one start-up for several runs). Not a test module itself."""

import json
import sys

import torch

if __name__ == "__main__":
    import tuneforge

    torch.set_num_threads(1)
    for overrides in json.loads(sys.argv[1]):
        tuneforge.train(tuneforge.load_config(None, overrides))
