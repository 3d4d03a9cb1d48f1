"""``python -m omnifuse.study {run,plan,report} CONFIG [--out DIR] [--world DIR] [--arms a,b] [--profile NAME]``.

CONFIG is a study (``configs/study/tiny.yaml``) or a scaling sweep (a YAML with ``kind: scaling``,
``configs/study/scaling.yaml``: :mod:`omnifuse.scaling`), which also takes ``--profile``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

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
    p.add_argument("--profile", help="a scaling sweep's profile (default: its default_profile), e.g. cpu or gpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        data = yaml.safe_load(Path(args.config).read_text())
        from omnifuse.scaling.config import KIND, config_kind

        if isinstance(data, dict) and config_kind(data) == KIND:
            return _scaling(args)
        if args.profile:
            raise StudyConfigError(f"--profile: {args.config} is a study, not a scaling sweep (kind: {KIND})")
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


def _scaling(args: argparse.Namespace) -> int:
    """The three commands on a scaling sweep (:mod:`omnifuse.scaling`)."""
    from omnifuse.scaling.config import load_scaling
    from omnifuse.study.runner import StudyError

    try:
        cfg = load_scaling(args.config, profile=args.profile, out_dir=args.out, world_dir=args.world)
        if args.arms:
            names = args.arms.split(",")
            unknown = [n for n in names if n not in {a.name for a in cfg.arms}]
            if unknown:
                raise StudyConfigError(f"--arms: no arm(s) {unknown} (arms: {', '.join(a.name for a in cfg.arms)})")
            cfg = dataclasses.replace(cfg, arms=[a for a in cfg.arms if a.name in names])  # checked again
    except StudyConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from omnifuse.scaling.runner import ScalingStudy

    try:
        if args.command == "run":
            ScalingStudy(cfg).run()
        elif args.command == "plan":
            print(ScalingStudy(cfg).describe())
        else:
            from omnifuse.scaling.report import write_scaling_report

            print(write_scaling_report(cfg, cfg.out_dir))
    except (StudyError, FileNotFoundError) as e:  # report before any run: no plan.json yet
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
