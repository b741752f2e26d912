"""Where the libraries' log lines go: a file in the job's output folder, errors on the console."""

import logging
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO


def _job(tmp_path, verbose: bool) -> subprocess.CompletedProcess:
    script = textwrap.dedent(
        f"""
        import logging, ray
        from dprm_ray.jobs.ray_session import init_ray

        init_ray(None, {str(tmp_path)!r}, num_cpus=1, include_dashboard=False)

        @ray.remote
        def actor_side():
            print("ACTOR-PRINT")

        ray.get(actor_side.remote())
        logging.getLogger("ray.data").info("RAY-DATA-INFO")
        logging.getLogger("ray").warning("RAY-WARNING")
        logging.getLogger("ray").error("RAY-ERROR")
        import time; time.sleep(1)  # the log monitor forwards actor output about once a second
        ray.shutdown()
        """
    )
    env = {"DPRM_RAY_VERBOSE": "1"} if verbose else {"DPRM_RAY_VERBOSE": "0"}
    import os

    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_library_lines_go_to_the_job_log_and_errors_to_the_console(tmp_path):
    quiet = _job(tmp_path / "quiet", verbose=False)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    console = quiet.stdout + quiet.stderr
    assert "RAY-ERROR" in console
    for hidden in ("ACTOR-PRINT", "RAY-WARNING", "Started a local Ray instance"):
        assert hidden not in console, console[-2000:]
    log = (tmp_path / "quiet" / "job.log").read_text()
    assert "Started a local Ray instance" in log and "RAY-WARNING" in log and "RAY-ERROR" in log

    loud = _job(tmp_path / "loud", verbose=True)
    assert loud.returncode == 0, loud.stderr[-2000:]
    console = loud.stdout + loud.stderr
    assert "ACTOR-PRINT" in console and "RAY-WARNING" in console, console[-2000:]
    assert not (tmp_path / "loud" / "job.log").exists()


def test_a_job_called_directly_routes_its_logs_until_the_test_ends(tmp_path):
    """A job function called without the runner (as several tests do) leaves its routing in place;
    conftest's undo_job_log_routing removes it before the next test, which the test below checks
    by comparing against the logging set-up it starts from (CI failed on that once, after the vLLM
    PPO test ran train_policy in the same worker)."""
    from dprm_ray.jobs.ray_session import route_library_logs

    route_library_logs(tmp_path / "direct" / "job.log")
    logging.getLogger("ray").warning("DIRECT")
    assert "DIRECT" in (tmp_path / "direct" / "job.log").read_text()


def test_a_second_job_in_one_process_logs_to_its_own_folder_and_the_first_is_undone(tmp_path):
    from dprm_ray.jobs.ray_session import restore_library_logs, route_library_logs

    loggers = [logging.getLogger(), logging.getLogger("ray"), logging.getLogger("ray.data")]
    assert not any(
        isinstance(h, logging.FileHandler) and h.baseFilename.endswith("job.log")
        for h in logging.getLogger().handlers
    ), "an earlier test's routing was left"
    before = [(list(lg.handlers), lg.level, [h.level for h in lg.handlers]) for lg in loggers]
    try:
        route_library_logs(tmp_path / "a" / "job.log")
        route_library_logs(tmp_path / "b" / "job.log")
        logging.getLogger("ray").warning("ONLY-IN-B")
        logging.getLogger("ray.data").warning("RAY-DATA-IN-B")
        b = (tmp_path / "b" / "job.log").read_text()
        assert b.count("ONLY-IN-B") == 1 and b.count("RAY-DATA-IN-B") == 1
        assert "ONLY-IN-B" not in (tmp_path / "a" / "job.log").read_text()
    finally:
        restore_library_logs()
    after = [(list(lg.handlers), lg.level, [h.level for h in lg.handlers]) for lg in loggers]
    assert after == before
