"""The `alignkit` command line: `alignkit COMMAND [--config FILE.yaml] [--field value ...]`.

Every config field is an option (`max_steps` ↔ `--max-steps`); options override the file. User mistakes
(bad config, bad data, missing files) print one message and exit with status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing

from alignkit.config import (
    BonConfig,
    DPOConfig,
    EvalConfig,
    KTOConfig,
    LabelConfig,
    PPOConfig,
    RewardConfig,
    ServeConfig,
    SFTConfig,
    _base_type,
    build_config,
    config_fields,
    load_yaml,
    unknown_field_error,
)
from alignkit.errors import PREEMPTED_STATUS, Preempted, TrainingError, UserError

# command -> (config class, "module:function" that runs it, one-line description)
TRAIN_COMMANDS = {
    "sft": (SFTConfig, "alignkit.train.sft:train_sft", "supervised fine-tuning"),
    "reward": (RewardConfig, "alignkit.train.reward:train_reward",
               "reward model on pairwise (Bradley-Terry) or ranked (Plackett-Luce) data"),
    "dpo": (DPOConfig, "alignkit.train.dpo:train_dpo", "direct preference optimisation (DPO, IPO, cDPO, robust, "
            "hinge, SimPO, R-DPO) on pairwise data"),
    "kto": (KTOConfig, "alignkit.train.kto:train_kto", "Kahneman-Tversky optimisation on unary or pairwise data"),
    "ppo": (PPOConfig, "alignkit.train.ppo:train_ppo", "online RLHF: PPO, RLOO or GRPO with a KL penalty"),
}

# commands that are not training but read their fields the same way
TOOL_COMMANDS = {
    "label": (LabelConfig, "alignkit.judges.label:run_label",
              "RLAIF: a judge labels candidate responses (or ones a --policy generates) into a pairwise or ranked "
              "dataset"),
    "eval": (EvalConfig, "alignkit.judges.winrate:run_eval",
             "win rate of a model against a baseline under a judge, raw and length-controlled"),
    "bon": (BonConfig, "alignkit.bon:run_bon", "Best-of-N: sample n responses per prompt, keep the best by score"),
    "serve": (ServeConfig, "alignkit.serve.app:serve", "OpenAI-compatible HTTP server for a policy, optionally "
              "Best-of-N; batches concurrent requests"),
}
CONFIG_COMMANDS = {**TRAIN_COMMANDS, **TOOL_COMMANDS}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_options(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", metavar="FILE.yaml", help="read fields from a YAML file; options override it")
    for f in config_fields(cls):
        kind, inner = _base_type(hints[f.name])
        default = f.default if f.default is not None else "none"
        if isinstance(default, tuple):
            default = ",".join(default) or "(none)"
        default = '""' if default == "" else default
        choices = [c if c != "" else '""' for c in f.metadata.get("choices") or ()]
        doc = f.metadata.get("doc", "")
        help_text = f"{doc} (default: {default}{'; one of ' + '|'.join(choices) if choices else ''})"
        metavar = inner.__name__.upper() if kind != "list" else "VALUE"
        extra = {"nargs": "+"} if kind == "list" else {}
        if inner is bool:  # `--flag` alone means true; `--flag false` also works
            extra = {"nargs": "?", "const": "true"}
        parser.add_argument(_flag(f.name), dest=f.name, metavar=metavar, help=help_text,
                            default=argparse.SUPPRESS, **extra)


def _make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit", description="Align language models with preferences.", allow_abbrev=False)
    from alignkit import __version__

    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, _, desc) in CONFIG_COMMANDS.items():
        p = sub.add_parser(name, help=desc, description=f"alignkit {name}: {desc}. {cls.__doc__ or ''}",
                           allow_abbrev=False)
        _add_config_options(p, cls)
    data = sub.add_parser("data", help="data tools: `alignkit data check FILE ...`", allow_abbrev=False)
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    check = data_sub.add_parser("check", help="row counts, lengths, duplicates, problems", allow_abbrev=False)
    check.add_argument("files", nargs="+", help="data files (JSONL, JSON, Parquet, save_to_disk folders)")
    check.add_argument("--kind", default="auto",
                       choices=["auto", "sft", "pairwise", "ranked", "unary", "prompts"], help="row kind (default: auto)")
    check.add_argument("--model", default=None, help="count tokens with this model's tokenizer (else characters)")
    check.add_argument("--max-length", type=int, default=None, help="report rows longer than this many tokens")
    check.add_argument("--on-bad-row", default="error", choices=["error", "skip"], help="error or skip bad rows")
    demo = sub.add_parser("demo", help="a short end-to-end SFT -> reward model run on a built-in tiny example",
                          allow_abbrev=False)
    demo.add_argument("--output-dir", default="runs/demo", help="where the demo writes its runs (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    lab = sub.add_parser("lab", help="the gold-reward laboratory: every method against a known true reward",
                         description="alignkit lab: trains SFT, reward models, ppo (with and without the KL penalty, "
                         "and on an ensemble), dpo, ipo, kto and best-of-n from the same start and labelling budget "
                         "in a world whose true reward is known; writes summary.json and report.html.",
                         allow_abbrev=False)
    lab.add_argument("--preset", default="quick", choices=["quick", "full"],
                     help="quick (about 2 minutes on 2 CPU cores) or full (longer runs, more data)")
    lab.add_argument("--seed", type=int, default=0, help="seed for data, annotators, training and sampling (default: 0)")
    lab.add_argument("--output-dir", default="runs/lab", help="where summary.json, report.html and the runs go "
                     "(default: runs/lab)")
    lab.add_argument("--verbose", action="store_true", help="show the trainers' own progress output")
    # `annotate` reads its own sub-commands and options (alignkit.annotate.cli); listed here for --help
    sub.add_parser("annotate", add_help=False, help="the human-feedback web app: people rank candidate responses; "
                   "add-annotator, export (datasets for reward/dpo/kto), stats (agreement, position bias)")
    report = sub.add_parser("report", help="an HTML report of runs: curves, evaluation, hacking monitors, final "
                            "metrics, config differences", description="alignkit report: one self-contained HTML "
                            "file for any runs (sft, reward, dpo, kto, ppo; finished or not): a chart per logged "
                            "metric with one series per run, eval/* metrics, the reward-hacking monitors with the "
                            "detector's flag marked, final metrics, the config fields that differ, and the latest "
                            "samples of online runs.", allow_abbrev=False)
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (OUTPUT_DIR of a run), or a "
                        "folder of run folders such as runs/lab")
    report.add_argument("--output", default="report.html", help="the HTML file to write (default: report.html)")
    report.add_argument("--title", default=None, help="the report's title (default: the runs' names)")
    return parser


def _run_training(command: str, args: argparse.Namespace, extra: list[str]) -> None:
    cls, target, _ = CONFIG_COMMANDS[command]
    valid = [f.name for f in config_fields(cls)]
    for token in extra:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            raise unknown_field_error(name, valid)
        raise UserError(f"unexpected argument {token!r}")
    cli_values = {k: v for k, v in vars(args).items() if k in valid}
    file_values = load_yaml(args.config) if args.config else {}
    cfg = build_config(cls, file_values, cli_values, config_path=args.config or "")
    module, func = target.split(":")
    import importlib

    getattr(importlib.import_module(module), func)(cfg)


def _run_data_check(args: argparse.Namespace) -> None:
    from alignkit.data.check import check_rows, format_report
    from alignkit.data.formats import load_rows

    result = load_rows(list(args.files), kind=args.kind, on_bad_row=args.on_bad_row)
    count_tokens = None
    if args.model:
        from alignkit.models.load import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)
    report = check_rows(result, count_tokens=count_tokens, max_length=args.max_length)
    print(format_report(report))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _make_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command in CONFIG_COMMANDS:
            _run_training(args.command, args, extra)
        elif args.command == "annotate":
            from alignkit.annotate.cli import run_annotate

            run_annotate(argv[argv.index("annotate") + 1:])
        elif extra:
            raise UserError(f"unexpected arguments: {' '.join(extra)}")
        elif args.command == "data":
            if args.data_command != "check":
                raise UserError("usage: alignkit data check FILE [FILE ...] [--kind K] [--model M]")
            _run_data_check(args)
        elif args.command == "demo":
            from alignkit.demo import run_demo

            run_demo(args.output_dir, seed=args.seed)
        elif args.command == "lab":
            from alignkit.lab.run import run_lab

            run_lab(args.preset, seed=args.seed, output_dir=args.output_dir, quiet=not args.verbose)
        elif args.command == "report":
            from alignkit.report import write_report

            print(f"report: {write_report(args.run_dirs, args.output, title=args.title)}")
    except UserError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"alignkit: stopped: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(f"alignkit: {e}", file=sys.stderr)
        return PREEMPTED_STATUS
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry()
