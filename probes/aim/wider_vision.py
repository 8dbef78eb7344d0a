"""The attention-readout grounding probe on a tiny VLM with a wider, deeper vision tower and 4x the
image tokens (vision 128 wide, 4 layers, patch 8: 64 tokens per 128-pixel camera instead of 16), then
action training on decision frames only. The tiny VLM config is replaced for this process only (its own
Hugging Face cache), so nothing shipped changes.

    python probes/aim/wider_vision.py OUT_FOLDER GROUNDING_STEPS ACTION_STEPS
"""

import functools
import os
import sys
import tempfile

os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="zk0-wide-vlm-")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attention_grounding  # noqa: E402  (the attention readout replaces zk0lib.base's grounding head)

from zk0lib import model  # noqa: E402

WIDE_VISION = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}
model._tiny_vlm_folder = functools.partial(model._tiny_vlm_folder, vision={**WIDE_VISION, "patch_size": 8})

if __name__ == "__main__":
    attention_grounding.main()
