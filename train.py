"""Train an omnifuse model.

    python train.py fit -c configs/scale/tiny.yaml -c configs/fusion/native.yaml [--key value ...]
    python train.py fit ... --ckpt_path RUN/checkpoints/last.ckpt     # resume exactly
    python train.py validate|test -c RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt

Configs compose left to right; any key can be overridden on the command line (see --help and
--print_config). Multi-process: --trainer.strategy ddp --trainer.devices N [--trainer.num_nodes M].
"""

from omnifuse.training.cli import OmniCLI


def main(args=None) -> None:
    OmniCLI(args=args)


if __name__ == "__main__":
    main()
