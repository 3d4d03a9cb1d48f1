"""Evaluate omnifuse runs.

    python eval.py --ckpt RUN_DIR --suite world [--split test] [--limit N] [--out DIR]
    python eval.py compare RUN_DIR RUN_DIR ... --out DIR
"""

from omnifuse.eval.cli import main

if __name__ == "__main__":
    main()
