"""experiments/codec_ceiling.py: the best score a perfect DiT could reach through its codec."""

from __future__ import annotations


def test_codec_ceiling_scores_a_lossless_codec_as_the_target_and_a_lossy_one_lower():
    """The ceiling pipeline itself: encode -> decode of a lossless codec must change no score."""
    import numpy as np

    from cag.models.codec import LinearPatchCodec, PixelUnshuffleCodec, codec_weights_path
    from experiments import codec_ceiling

    rows = codec_ceiling.measure(3, 6, 64, {"target": None, "lossless": PixelUnshuffleCodec(4),
                                            "shipped": LinearPatchCodec.load(codec_weights_path("tiny_linear_f4c12"))})
    for k, v in rows["target"].items():
        np.testing.assert_allclose(rows["lossless"][k], v, atol=1e-6, err_msg=k)
    assert np.nanmean(rows["shipped"]["sc_subjects"]) < np.nanmean(rows["target"]["sc_subjects"])
