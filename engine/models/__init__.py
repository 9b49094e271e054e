from engine.models.llama import CausalLM

__all__ = ["CausalLM"]
