"""raylm: serve large language models on a Ray cluster."""
from raylm.config import log_level as _log_level
from raylm.logger import init_logger as _init_logger
from raylm.outputs import CompletionOutput, Logprob, RequestOutput
from raylm.sampling_params import SamplingParams

__version__ = "0.1.0"
_init_logger(_log_level())
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name):
    # LLM pulls in torch and transformers; import it lazily so `import raylm` stays light.
    if name == "LLM":
        from raylm.llm import LLM

        return LLM
    raise AttributeError(name)
