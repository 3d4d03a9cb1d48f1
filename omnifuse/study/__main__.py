"""``python -m omnifuse.study {run,plan,report} CONFIG [--out DIR] [--world DIR] [--arms a,b]``."""

from __future__ import annotations

import argparse
import sys

from omnifuse.study.config import StudyConfigError, load_study


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m omnifuse.study", description=__doc__)
    p.add_argument("command", choices=["run", "plan", "report"],
                   help="run: train, evaluate, compare and report (resumes where it stopped); plan: list the "
                   "runs without training (steps are known once the stages exist); report: rewrite the report")
    p.add_argument("config", help="study YAML (configs/study/*.yaml)")
    p.add_argument("--out", help="output folder (default: the config's out_dir)")
    p.add_argument("--world", help="world folder (default: the config's world_dir)")
    p.add_argument("--arms", help="comma-separated subset of the config's arms (the baseline must stay)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = load_study(args.config, out_dir=args.out, world_dir=args.world)
        if args.arms:
            from omnifuse.study.config import select_arms

            cfg = select_arms(cfg, args.arms.split(","))
    except StudyConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from omnifuse.study.runner import Study, StudyError

    try:
        if args.command == "run":
            Study(cfg).run()
        elif args.command == "plan":
            print(Study(cfg).describe())
        else:
            from omnifuse.study.report import write_study_report

            print(write_study_report(cfg, cfg.out_dir))
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
