"""``stlib train``: the command line of the training stage (also ``torchrun -m stlib.train``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from stlib.config import TrainRecipe, add_config_arguments, config_from_args, given_options
from stlib.train.config import TrainConfig, apply_overrides
from stlib.train.loop import DistInfo, train
from stlib.train.study import VARIANTS, variant_config

#: recipe fields that describe the study (which runs, how many seeds), not one run
_STUDY_FIELDS = ("recipes", "n_seeds")


def cli_parser() -> argparse.ArgumentParser:
    """The parser of ``stlib train``; the recipe options are generated from :class:`stlib.config.TrainRecipe`."""
    p = argparse.ArgumentParser(
        prog="stlib train",
        description="Train the HoVer-Net-style network on a tile store. The recipe of a profile comes from "
                    "params/{profile}.yaml (block 03_training, a TrainRecipe), its one source; --config takes a "
                    "TrainConfig YAML/JSON instead (e.g. the config.json of a trained model). The recipe options "
                    "below override either. Under torchrun (WORLD_SIZE > 1) it runs data-parallel.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", help="demo | workshop | paper | a params YAML: its 03_training recipe")
    src.add_argument("--config", help="a YAML/JSON file of TrainConfig keys (e.g. models/st/config.json)")
    p.add_argument("--run-dir", default=None, help="run folder (tiles/ in, models/ out); default: the profile's "
                                                  "run_dir / the config's")
    p.add_argument("--run", default="st", metavar="NAME",
                   help=f"with --profile: the training run, one of {sorted(VARIANTS)} or st__<labeler> (default st)")
    p.add_argument("--seed-index", type=int, default=0, help="with --profile: which training seed (0 = the first)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig key (YAML value; loss.nt_ce=0.5 for nested keys); repeatable")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from checkpoint.pt / skip a finished run (default); never: start over")
    add_config_arguments(p, TrainRecipe, exclude=_STUDY_FIELDS)
    return p


def config_from_cli(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``stlib train`` options."""
    if args.profile:
        from stlib.config import load_params, make_params

        params = make_params("03_training", load_params(args.profile, "03_training"))
        recipe = config_from_args(TrainRecipe, args, base=params.recipe)
        changes = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(TrainRecipe)}
        if args.run_dir:
            changes["run_dir"] = args.run_dir
        params = dataclasses.replace(params, **changes)
        base = variant_config(params, args.run, seed_index=args.seed_index).to_dict()
        return TrainConfig.from_dict(apply_overrides(base, args.overrides), source=f"profile {args.profile}")
    given = given_options(TrainRecipe, args)
    if "nt_confidence" in given:
        given["loss"] = {"nt_confidence": given.pop("nt_confidence")}
    extra = [f"{k}={v}" for k, v in (("run_dir", args.run_dir),) if v]
    config = TrainConfig.from_yaml(args.config, overrides=[*extra, *args.overrides])
    if given:
        raw = config.to_dict()
        raw.update({k: ({**raw.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in given.items()})
        config = TrainConfig.from_dict(raw, source="command line")
    return config


def cli_main(argv: list[str]) -> int:
    """``stlib train (--profile P [--run NAME] [--seed-index K] | --config FILE) [recipe options] [--set key=value ...]``."""
    args = cli_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = train(config_from_cli(args), resume=args.resume)
    if DistInfo.from_env().is_main:
        keys = ("loss", "val_loss", "val_dice", "val_bpq")
        summary = ", ".join(f"{k}={res.final[k]:.4f}" for k in keys if k in res.final)
        state = "already finished" if res.skipped else f"{res.steps} steps in {res.wall_s:.1f}s"
        print(f"stlib train: {state}; {summary}; model: {res.model_path}")
    return 0
