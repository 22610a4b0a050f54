"""``--config FILE``: a run repeated exactly from its saved run_config.json.

What a user relies on: ``ps-local --config RUN/run_config.json --out NEW`` gives the same
losses and the same model bytes as the run that wrote the file; a flag typed beside
``--config`` wins over the file (on ps-local, on the workers, on ps-train); a key or a
section the command does not know is refused, naming it, before anything starts; a
ps-train run_config.json written before the run folder was called ``out`` still reads.
"""
import json
import shutil

import pytest

from common.launch import local
from tests.test_local import SMALL, ps_local
from worker import __main__ as worker_main
from worker.train import parse_configs, train


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A small ps-local job (2 servers, 2 workers, BSP, 12 steps): its run folder."""
    out = tmp_path_factory.mktemp("config") / "first"
    done = ps_local("--steps", 12, "--out", out, "--no-progress", *SMALL, "--eval-interval", 5, "--lr", 0.01,
                    timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def losses(run):
    return [(r["step"], r.get("loss"), r.get("val_loss"))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_a_run_repeated_from_its_run_config_gives_the_same_bits(first_run, tmp_path):
    again = tmp_path / "again"
    done = ps_local("--config", first_run / "run_config.json", "--out", again, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert losses(again) == losses(first_run) and len(losses(again)) >= 4
    assert (again / "model.safetensors").read_bytes() == (first_run / "model.safetensors").read_bytes()
    saved = json.loads((again / "run_config.json").read_text())
    assert saved["optimizer"]["lr"] == 0.01 and saved["worker"]["model"]["n_embd"] == 32


def test_flags_typed_beside_config_override_the_file(first_run):
    config = str(first_run / "run_config.json")
    _, args, worker_args = local.parse(["--config", config, "--lr", "0.5", "--workers", "3", "--n-embd", "48"])
    assert (args.lr, args.workers, args.steps, args.mode) == (0.5, 3, 12, "bsp")      # typed, typed, saved, saved
    assert args.lr_decay_steps is None                  # it followed --steps: it follows it again
    assert worker_args[:2] == ["--config", str(first_run.resolve() / "run_config.json")]
    assert worker_args[2:] == ["--n-embd", "48"]         # after --config: the workers let it win
    _, wargs, _ = worker_main.parse(worker_args + ["--steps", "7"])
    assert (wargs.n_embd, wargs.n_layer, wargs.steps, wargs.eval_interval) == (48, 1, 7, 5)
    assert wargs.out == ""                              # the run folder is never taken from a file


def edited(first_run, tmp_path, edit) -> str:
    saved = json.loads((first_run / "run_config.json").read_text())
    edit(saved)
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(saved))
    return str(path)


@pytest.mark.parametrize("edit, named", [
    (lambda d: d["launcher"].update(bogus=1), "unknown key(s) ['bogus']"),
    (lambda d: d["job"].update(stalenes=2), "unknown key(s) ['stalenes']"),
    (lambda d: d["optimizer"].update(lr="fast"), "OptimConfig.lr must be float, got str 'fast'"),
    (lambda d: d.update(extra={}), "unknown section(s) ['extra']"),
    (lambda d: d.pop("launcher"), "no 'launcher' section"),
])
def test_ps_local_refuses_what_it_does_not_know_naming_it(first_run, tmp_path, capsys, edit, named):
    with pytest.raises(SystemExit):
        local.parse(["--config", edited(first_run, tmp_path, edit)])
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("edit, named", [
    (lambda d: d["worker"]["model"].update(n_emb=8), "[model]: unknown key(s) ['n_emb']"),
    (lambda d: d["worker"].update(optimizer={}), "unknown section(s) ['optimizer']"),
])
def test_a_worker_refuses_what_it_does_not_know_naming_it(first_run, tmp_path, capsys, edit, named):
    with pytest.raises(SystemExit):
        worker_main.parse(["--config", edited(first_run, tmp_path, edit)])
    assert named in capsys.readouterr().err


def test_ps_local_stops_before_starting_on_a_bad_worker_section(first_run, tmp_path):
    config = edited(first_run, tmp_path, lambda d: d["worker"]["data"].update(shuffle=True))
    done = ps_local("--config", config, "--out", tmp_path / "never", timeout=60)
    assert done.returncode == 2 and "[data]: unknown key(s) ['shuffle']" in done.stderr
    assert not (tmp_path / "never").exists()


def test_ps_train_repeats_a_run_and_reads_files_that_named_the_folder_out_dir(tmp_path, capsys):
    from tests.test_train import TINY
    first = train(parse_configs([*TINY, "--steps", "3", "--out", str(tmp_path / "a")]))
    again = train(parse_configs(["--config", str(tmp_path / "a"), "--out", str(tmp_path / "b")]))
    assert again["val_loss"] == first["val_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    old = json.loads((tmp_path / "a" / "run_config.json").read_text())
    old["train"]["out_dir"] = old["train"].pop("out")              # as written before the rename
    shutil.copytree(tmp_path / "a", tmp_path / "old")
    (tmp_path / "old" / "run_config.json").write_text(json.dumps(old))
    configs = parse_configs(["--resume", str(tmp_path / "old"), "--steps", "4"])
    assert configs["train"].out == str(tmp_path / "old") and configs["train"].steps == 4
    configs = parse_configs(["--config", str(tmp_path / "old"), "--seed", "3"])
    assert configs["train"].out == "" and configs["train"].seed == 3 and configs["model"].n_embd == 16
    capsys.readouterr()


def test_a_server_started_by_hand_takes_the_jobs_settings_from_the_file(first_run, tmp_path, capsys):
    from paramserver import __main__ as server_main
    config = str(first_run / "run_config.json")
    args = server_main.parse(["--config", config, "--rank", "1", "--warmup-steps", "7"])
    assert (args.lr, args.lr_decay_steps, args.warmup_steps, args.mode, args.rank) == (0.01, 12, 7, "bsp", 1)
    with pytest.raises(SystemExit):
        server_main.parse(["--config", edited(first_run, tmp_path, lambda d: d["optimizer"].update(lrr=1.0))])
    assert "[optimizer]: unknown key(s) ['lrr']" in capsys.readouterr().err
