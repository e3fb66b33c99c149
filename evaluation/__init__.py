"""Evaluation: MLLM judge (PF / SC / Overall), DINO / CLIP-I / CLIP-T, reports."""
