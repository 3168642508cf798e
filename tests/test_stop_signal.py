"""A stop signal that lands inside a ``__del__`` (Ray's ActorHandle.__del__ runs often in a sweep driver) is
neither lost nor printed as an "Exception ignored" traceback: the CLI raises it again where the program is."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import gc, os, signal, sys, time
    from raydyn import cli

    # as from a terminal: a parent that runs us in the background (nohup, `&` in a script) passes SIGINT on
    # ignored, and then the CLI rightly leaves it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli._install_stop_handlers()

    class Handle:  # stands in for ray.actor.ActorHandle
        def __del__(self):
            os.kill(os.getpid(), signal.{sig})
            t = time.perf_counter()
            while time.perf_counter() - t < 0.2:  # the handler runs here, inside __del__
                pass

    try:
        Handle()
        gc.collect()
        deadline = time.perf_counter() + 5
        while time.perf_counter() < deadline:
            time.sleep(0.01)
        print("stop lost")
        sys.exit(3)
    except KeyboardInterrupt as e:
        print("stopped by", type(e).__name__, cli._stopped_by)
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_inside_del_is_redelivered(sig):
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(sig=sig)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    name = "Terminated" if sig == "SIGTERM" else "KeyboardInterrupt"
    num = 15 if sig == "SIGTERM" else 2
    assert p.stdout.strip() == f"stopped by {name} [{num}]", p.stdout + p.stderr
    assert "Exception ignored" not in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_other_unraisable_exceptions_still_reach_the_previous_hook():
    code = textwrap.dedent("""
        import gc, sys
        seen = []
        sys.unraisablehook = lambda u: seen.append(type(u.exc_value).__name__)
        from raydyn import cli
        cli._install_stop_handlers()
        cli._install_stop_handlers()  # twice: still one link to the previous hook
        class Bad:
            def __del__(self):
                raise ValueError("a real one")
        Bad(); gc.collect()
        print(seen)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "['ValueError']", p.stdout + p.stderr
