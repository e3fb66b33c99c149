"""Clients for remote model endpoints (MLLM judge, grounding VLM), kept apart from the model
code so that evaluation and data preparation can run without torch-heavy imports."""

from cag.remote.chat import ChatClient, ChatRequest, ChatResult, image_to_data_url

__all__ = ["ChatClient", "ChatRequest", "ChatResult", "image_to_data_url"]
