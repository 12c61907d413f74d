"""Progress bars of the libraries featmatch calls, kept out of logs and executed notebooks."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["quiet_progress_bars"]


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Turn off the progress bars of ``transformers`` and ``huggingface_hub`` inside the block.

    ``from_pretrained`` draws a ``Loading weights`` bar (and GGUF dequantisation another);
    in an executed notebook each becomes a stderr output in the book. The previous state of
    each library's switch is restored on exit, so a caller that wants the bars elsewhere
    keeps them. The switches are process-global: loads in other threads are quiet too while
    the block runs.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    transformers_on = hf_logging.is_progress_bar_enabled()
    hub_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # switches both libraries off
    try:
        yield
    finally:
        with warnings.catch_warnings():  # the hub warns if HF_HUB_DISABLE_PROGRESS_BARS pins it off
            warnings.simplefilter("ignore")
            if transformers_on:
                hf_logging.enable_progress_bar()  # switches both libraries on
            if hub_off:
                disable_progress_bars()
            else:
                enable_progress_bars()
