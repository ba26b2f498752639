r"""MSR-VTT-style zero-shot evaluation (the paper's Table: FID and CLIPSIM over 59,794 captions).

  python -m mav_jax.evaluate --config configs/eval/msrvtt.py \
      --config.captions=/data/msrvtt/MSRVTT_data.json --config.real_videos=/data/msrvtt/videos \
      --config.inception=/weights/pt_inception-2015-12-05-6726825d.pth \
      --checkpoints workdirs/my_cascade --output outputs/eval/msrvtt

One video per test caption goes through the cascade; FID compares Inception-v3 pool3 features of
every generated frame with those of the real test videos' frames (the same frame count and rate);
CLIPSIM is the mean cosine between each caption's and each generated frame's CLIP embedding. The
paper used OpenAI's ViT-B/32 for CLIPSIM: convert it with mav_jax.models.clip_convert and pass it
as `clip` (the default is the cascade's own CLIP, whose numbers are not comparable).
"""

import ml_collections

from mav_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  config = config_defaults.new_eval_config("msrvtt")
  # Captions: MSR-VTT's annotation JSON ({"sentences": [...]}) or a .txt with one per line.
  config.captions = ""
  # For the JSON: keep only the test split (video7010 ... video9999).
  config.test_split = True
  config.metrics = "fid,clipsim"
  return config
