"""Micro-benchmarks behind the README's performance figures; run as scripts."""
