"""Ablation pipelines and tables of the paper, built on cag and evaluation."""
