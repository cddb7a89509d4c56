import io

from genmodels.progress import Progress, local_ray_env, number, train_display


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_one_line_per_update_and_nothing_for_the_start():
    stream = io.StringIO()
    progress = Progress("train gan", 12, stream=stream)
    progress.update(4, start=True)  # a run resumed at step 4
    progress.update(8, {"loss_d": 1.23456, "img/s": 812.04})
    progress.say("train gan: rank 1 failed: RuntimeError('boom')")
    progress.update(12, {"loss_d": 0.5})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[1] == "train gan: rank 1 failed: RuntimeError('boom')"
    assert lines[0].startswith("train gan  step 8/12 67%  loss_d 1.235  img/s 812 ")
    assert lines[2].startswith("train gan  step 12/12 100%  loss_d 0.5 ") and lines[2].endswith("eta 0m00s")


def test_on_a_terminal_a_tqdm_bar_that_starts_where_the_run_resumed():
    stream = Terminal()
    progress = Progress("train gan", 12, stream=stream)
    progress.update(4, start=True)
    progress.update(8, {"fid": 45.0}, note="eval")
    progress.update(4, start=True)  # a worker failed: the group restarted from the step-4 checkpoint
    progress.close()
    out = stream.getvalue()
    assert "\r" in out and "8/12" in out and "eval  fid 45" in out and "train gan: restarted at step 4\n" in out
    assert "1/12" not in out and "5/12" not in out  # the bar jumped from the resumed step, it did not count from 0


def test_the_train_display_keeps_the_last_periodic_metric_between_evaluations():
    render = train_display(("train/loss_d", "train/loss_g"), "eval/fid")
    assert render({"step": 0, "start": True}) == {"done": 0, "numbers": {}, "start": True}
    first = render({"step": 4, "train/loss_d": 1.0, "train/loss_g": 2.0, "train/img_per_s": 100.0, "eval/fid": 50.0})
    assert first["numbers"] == {"loss_d": 1.0, "loss_g": 2.0, "img/s": 100.0, "fid": 50.0}
    later = render({"step": 6, "train/loss_d": 0.5, "train/loss_g": 2.5, "train/img_per_s": 120.0})
    assert later["numbers"]["fid"] == 50.0 and later["numbers"]["loss_d"] == 0.5 and later["done"] == 6


def test_numbers_are_compact():
    assert [number(v) for v in (1234.5678, 0.000012, 0.5, 0.0, float("nan"), 123456.0)] == \
        ["1235", "1.2e-05", "0.5", "0", "nan", "1.23e+05"]


def test_the_preemption_watcher_is_off_only_for_a_quiet_local_ray(monkeypatch):
    monkeypatch.delenv("GENMODELS_VERBOSE", raising=False)
    assert local_ray_env() == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    monkeypatch.setenv("GENMODELS_VERBOSE", "1")
    assert local_ray_env() == {}
