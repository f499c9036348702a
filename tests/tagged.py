"""Run a streamsink command with a tag in its environment, and find every process that still
carries it: whatever the command started (engine cores, workers, Ray's processes, Prometheus)
inherits the environment, so after a stop the process table must hold no tagged process."""
import os
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG_VAR = "STREAMSINK_TEST_TAG"


def new_tag() -> str:
    return uuid.uuid4().hex[:12]


def tagged_env(tag: str, **extra: str) -> dict:
    env = dict(os.environ, **{TAG_VAR: tag}, **extra)
    env.pop("RAY_ADDRESS", None)
    env.pop("STREAMSINK_METRICS_DIR", None)
    return env


def start(args: list[str], tag: str, log_path, **extra_env: str) -> subprocess.Popen:
    """`streamsink ARGS` with the tag, output to log_path."""
    return subprocess.Popen([sys.executable, "-m", "streamsink.serving.cli", *args], cwd=ROOT,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=tagged_env(tag, **extra_env))


def tagged_processes(tag: str) -> list[str]:
    """Command lines of the live processes whose environment carries the tag."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    continue  # a zombie holds nothing; its parent just has not reaped it yet
            found.append(f"{pid}: {cmd[:200]}")
        except OSError:
            continue
    return found


def leftovers(tag: str, wait_s: float = 10.0) -> list[str]:
    """Tagged processes still alive after up to wait_s (a stop's last exits can lag a little)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def kill_tagged(tag: str) -> None:
    """Test clean-up after a failure: SIGKILL whatever still carries the tag."""
    for line in tagged_processes(tag):
        try:
            os.kill(int(line.split(":")[0]), 9)
        except OSError:
            pass


def stop_and_time(proc: subprocess.Popen, sig: int, timeout_s: float = 60) -> float:
    """Send sig, wait for the exit; seconds it took."""
    t = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=timeout_s)
    return time.monotonic() - t


def wait_for(predicate, timeout_s: float, what: str, proc=None, log_path=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited before {what}:\n" + _tail(log_path))
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s:.0f} s:\n" + _tail(log_path))
        time.sleep(0.5)


def _tail(log_path) -> str:
    try:
        return open(log_path, errors="replace").read()[-3000:] if log_path else ""
    except OSError:
        return ""
