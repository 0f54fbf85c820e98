"""`python -m llmclock` and the `llmclock` console script.

Nothing is imported here before the handler is in place, so Ctrl-C even during the first imports
ends with one line and exit status 130.
"""

import os
import signal
import sys
import threading


def _interrupt(signum, frame) -> None:
    """Ctrl-C: KeyboardInterrupt, but never in the middle of an import, where a library's bare
    `except:` can swallow it (seen: a Ctrl-C while the libraries were loading that did nothing): there it
    is delivered again 50 ms later, until it lands outside every import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def run() -> None:
    try:
        # from here KeyboardInterrupt is handled below (llmclock/__init__.py covered the imports before)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # an ignored Ctrl-C (nohup, &) stays ignored
            signal.signal(signal.SIGINT, _interrupt)
        from .cli import main

        code = main()
    except KeyboardInterrupt:  # while the command line modules were still being imported
        sys.stderr.write("llmclock: interrupted\n")
        code = 130
    if code == 130:  # skip interpreter teardown: a module whose import was cut short can fail again in it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
