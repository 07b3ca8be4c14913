"""fastlm's log: where a call that fastlm's kernels cannot serve runs on another path.

Such a case (a float64 or complex parameter, a LayerNorm row longer than the kernels take,
Adam with differentiable=True, ...) still gives torch's result, on a slower path; the first
time each case occurs it is said once, at INFO level, on the logger "fastlm":

    logging.getLogger("fastlm").setLevel(logging.INFO)   # plus a handler, e.g. basicConfig
"""

import logging

logger = logging.getLogger("fastlm")
_said = set()


def log_once(key, message):
    """Log `message` (INFO) the first time `key` is seen in this process."""
    if key in _said:
        return
    _said.add(key)
    logger.info(message)
