"""vLLM behind wsync: the ONLY package that imports vllm, and only inside functions (importing any of
its modules never imports vllm; tests/unit/test_vllm_detect.py proves it).

Modules: detect (which generation is installed, what it can do), payloads (update/init info dicts,
engine kwargs, byte counts), trainer (the trainer side of vLLM's wire), comm (the communicator
surface), worker (WsyncWorkerExtension, loaded by vLLM into its worker), direct (wsync's wire straight
into the runtime parameters, a mixin of the extension), engine (VLLMEngineCore, the engine contract)."""

from .detect import EXTENSION_QUALNAME, VLLMApi, VLLMUnsupportedError, detect_generation, receive_plan
from .engine import VLLMEngineCore, VLLMEngineError
from .trainer import TrainerGroup, trainer_close_group, trainer_open_group, trainer_send_dense, trainer_send_sparse

__all__ = [
    "EXTENSION_QUALNAME", "TrainerGroup", "VLLMApi", "VLLMEngineCore", "VLLMEngineError", "VLLMUnsupportedError",
    "detect_generation", "receive_plan", "trainer_close_group", "trainer_open_group", "trainer_send_dense",
    "trainer_send_sparse",
]
