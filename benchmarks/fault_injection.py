"""``python benchmarks/fault_injection.py serve ...``: the real ``ctzoo serve`` with a controlled delay injected into
one named stage, for the anomaly detection benchmark (benchmarks/perf_detection.py). Never used by ctzoo itself.

Set by the environment:

``CTZOO_FAULT_STAGE``
    ``decode``: a request whose v2 ``id`` starts with ``delay-`` sleeps ``CTZOO_FAULT_DELAY_S`` inside its decode
    (the thread-pool call that parses and checks the tensors), after the real decode.
    ``model``: a model batch holding a row whose ``image[row, 0, 0, 0]`` is ``MARK`` sleeps inside the batcher's
    model run; every request of that batch then really had a slow model stage, so the injector appends the
    request numbers of the batch (``image[row, 0, 0, 1]``) to ``CTZOO_FAULT_TRUTH``, one per line.
    Unset: nothing is injected (the same launcher, so that both sides of a comparison run the same code).
``CTZOO_FAULT_DELAY_S``
    The delay in seconds.
"""

from __future__ import annotations

import os
import sys
import time

#: The marker value of a request whose model batch is delayed (an image value no request otherwise carries).
MARK = -4242.0


def _delay_decode(seconds: float) -> None:
    import ctzoo.serve.app as app

    decode = app.decode_request

    def delayed_decode(*args, **kwargs):
        decoded = decode(*args, **kwargs)
        if decoded.id is not None and decoded.id.startswith("delay-"):
            time.sleep(seconds)
        return decoded

    app.decode_request = delayed_decode


def _delay_model(seconds: float, truth: str) -> None:
    from ctzoo.serve.batching import MicroBatcher

    run_batch = MicroBatcher._run_batch

    def delayed_run_batch(self, batch):
        images = [pending.inputs["image"] for pending in batch]
        if any((image[:, 0, 0, 0] == MARK).any() for image in images):
            time.sleep(seconds)
            with open(truth, "a") as sink:
                sink.writelines(f"{int(n)}\n" for image in images for n in image[:, 0, 0, 1])
        return run_batch(self, batch)

    MicroBatcher._run_batch = delayed_run_batch


def main() -> None:
    stage, seconds = os.environ.get("CTZOO_FAULT_STAGE"), float(os.environ.get("CTZOO_FAULT_DELAY_S", "0"))
    if stage == "decode":
        _delay_decode(seconds)
    elif stage == "model":
        _delay_model(seconds, os.environ["CTZOO_FAULT_TRUTH"])
    elif stage:
        raise SystemExit(f"unknown CTZOO_FAULT_STAGE {stage!r}: use decode or model")
    from ctzoo.cli import main as ctzoo_main

    ctzoo_main(sys.argv[1:], prog_name="ctzoo")


if __name__ == "__main__":
    main()
