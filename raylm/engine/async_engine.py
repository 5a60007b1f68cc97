"""AsyncEngine: an asyncio front for one LLMEngine, with per-request output streams.

The engine loop runs each `step()` on the event loop's own thread, hands the step's outputs
to their requests' sinks (and step listeners, which send them on), then lets the loop run
what is ready so arrivals, aborts and output sends get through. A step in a worker
thread keeps the loop responsive during the step, but the two threads then contend for the
GIL (every torch op releases and re-takes it): measured with `raylm bench serve --backend
inprocess` (fp32, 32 in flight) that cost 20% of throughput (99 vs 124 tok/s), and 10%
behind Serve (79 vs 87). Adds and aborts are queued and applied between steps, so the
scheduler is only ever touched from one place. A long prefill step (seconds on CPU) delays
health checks and stats by as much; their timeouts are far longer.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
import weakref
from typing import AsyncIterator, Callable, Dict, List, Optional, Tuple

from raylm.config import EngineConfig
from raylm.engine.llm_engine import LLMEngine, PromptType
from raylm.exceptions import EngineDeadError, EngineOverloadedError
from raylm.outputs import DeltaState, RequestOutput, delta_output
from raylm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Between steps the loop runs what is ready. A `generate()` consumer is several hops of the
# loop away from its output (queue, generator, HTTP layers ...), so while one is open the
# loop gets STEP_YIELD_S; sinks (the Serve replica's) take each output at once, so without
# queue consumers a few passes let arrivals, aborts and sends through (a 1 ms sleep per step
# was 10% of a single stream's decode time).
STEP_YIELD_S = 0.001
SINK_YIELD_PASSES = 8
WATCHDOG_POLL_S = 5.0


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.streams: Dict[str, Callable[[object], None]] = {}  # request id -> its output sink
        self._step_listeners: List[Callable[[], None]] = []
        self._busy_hook: Optional[Callable[[bool], None]] = None
        self._queue_consumers = 0  # generate() streams open
        self._deltas: Dict[str, DeltaState] = {}  # streams that asked for output_kind="delta"
        self._pending_adds: List[Tuple[PromptType, SamplingParams, str]] = []
        self._pending_aborts: List[str] = []
        self._pending_calls: List[Callable[[], None]] = []
        self._wakeup: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self.dead: Optional[BaseException] = None
        self._step_started: Optional[float] = None  # monotonic time the running step began
        self._watchdog: Optional[threading.Thread] = None
        self._stopped = threading.Event()  # set by shutdown(): the watchdog exits at once
        # A simulated device's step time is awaited here rather than slept through in the
        # step, so engines sharing one event loop (sim fleets) step concurrently.
        self.engine.core.executor.defer_device_time()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def waves(self):
        """The lockstep wave state of an expert-parallel DP replica (None otherwise)."""
        return self.engine.core.waves

    def warmup(self) -> None:
        """One throwaway request, so the first real one does not pay for kernel JIT."""
        self.engine.warmup()

    def has_scheduled_requests(self) -> bool:
        """Requests in the scheduler (waiting or running); a lockstep wave aside."""
        return self.engine.core.scheduler.has_unfinished_requests()

    def collective_rpc(self, method: str, args=()) -> list:
        """Call `method` on every worker of this engine's executor; their answers in rank order."""
        return self.engine.core.executor.collective_rpc(method, args)

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's output constraint, if any, in a thread: the step loop runs on
        this event loop, so a compile there would stall every request's next step. `submit`
        then finds it in the grammar cache (a constraint that does not compile raises here)."""
        if params.structured_outputs is not None:
            self._admit()  # a replica that would refuse the request does not compile for it
            await asyncio.to_thread(self.engine.compile_grammar, params)

    def submit(self, prompt: PromptType, params: SamplingParams, request_id: str,
               sink: Callable[[object], None]) -> None:
        """Queue a request whose outputs the engine loop hands to `sink` (a RequestOutput, or
        the exception that ends the request) as each step ends; `release` it when done.
        Bad input raises here, before anything is queued."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead!r}")
        if request_id in self.streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._admit()
        text, ids = self.engine.tokenize_prompt(prompt)
        self.engine.validate(ids, params)
        self.streams[request_id] = sink
        if params.output_kind == "delta":
            self._deltas[request_id] = DeltaState()
        # queue the tokenized form: the engine loop must not tokenize the prompt a second time
        self._pending_adds.append(({"prompt": text, "prompt_token_ids": ids}, params, request_id))
        self._ensure_loop()

    def release(self, request_id: str, finished: bool) -> None:
        """Stop delivering to a request's sink; abort the request unless it `finished`."""
        self.streams.pop(request_id, None)
        self._deltas.pop(request_id, None)
        if not finished:
            self.abort(request_id)

    def add_step_listener(self, fn: Callable[[], None]) -> None:
        """Call `fn` after each step's outputs reached their sinks, before the next step (to
        send them on at once, in one message)."""
        self._step_listeners.append(fn)

    def set_busy_hook(self, fn: Optional[Callable[[bool], None]]) -> None:
        """Call `fn(True)` on the loop thread before each step, `fn(False)` when the loop
        goes idle (raylm.executor.cpu_share sizes the step's threads with it)."""
        self._busy_hook = fn

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs until finished: cumulative, or only what is new when
        `params.output_kind == "delta"`. Closing the generator early (client gone, task
        cancelled) aborts the request and frees its blocks."""
        queue: asyncio.Queue = asyncio.Queue()
        await self.prepare(params)
        self.submit(prompt, params, request_id, queue.put_nowait)
        finished = False
        self._queue_consumers += 1
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queue_consumers -= 1
            self.release(request_id, finished)

    def num_waiting(self) -> int:
        """Sequences accepted that will not run at the next step: those queued for the loop or
        in the scheduler's queue, less the free running slots they will take."""
        sched = self.engine.core.scheduler
        free_slots = max(0, self.engine.config.scheduler.max_num_seqs - sched.num_running)
        return max(0, len(self._pending_adds) + sched.num_waiting - free_slots)

    def _admit(self) -> None:
        bound = self.engine.config.scheduler.max_waiting_requests
        waiting = 0 if bound is None else self.num_waiting()
        if bound is not None and waiting >= bound:
            raise EngineOverloadedError(f"{waiting} requests are waiting in this replica "
                                        f"(max_waiting_requests={bound})")

    def abort(self, request_id: str) -> None:
        self._pending_aborts.append(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def wake(self) -> None:
        """Make the engine loop look for work now (e.g. a lockstep wave started elsewhere)."""
        self._ensure_loop()

    def call_between_steps(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine loop between two steps (it may touch the engine freely)."""
        self._pending_calls.append(fn)
        self._ensure_loop()

    def _ensure_loop(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        if self._watchdog is None:
            args = (weakref.ref(self), threading.get_ident(), self._stopped)
            self._watchdog = threading.Thread(target=_watch, args=args, name="raylm-step-watchdog",
                                              daemon=True)
            self._watchdog.start()
        self._wakeup.set()

    def _apply_pending(self) -> None:
        adds, self._pending_adds = self._pending_adds, []
        for prompt, params, request_id in adds:
            try:
                self.engine.add_request(prompt, params, request_id)
            except Exception as exc:  # validated already; anything here is this request's error
                self._deliver(request_id, exc)
        aborts, self._pending_aborts = self._pending_aborts, []
        for request_id in aborts:
            self.engine.abort_request(request_id)
        calls, self._pending_calls = self._pending_calls, []
        for fn in calls:
            fn()

    async def _run(self) -> None:
        try:
            while True:
                self._apply_pending()
                busy = self.engine.has_unfinished_requests()
                if self._busy_hook is not None:
                    self._busy_hook(busy)
                if not busy:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._step_started = time.monotonic()
                outputs = self.engine.step()
                self._step_started = None
                due = self.engine.core.executor.due_in()
                if due > 0:  # a simulated step: its outputs are due after its device time
                    await asyncio.sleep(due)
                if self.dead is not None:  # the watchdog gave up on this step while it ran
                    raise self.dead
                for out in outputs:
                    self._deliver(out.request_id, out)
                for fn in self._step_listeners:
                    fn()
                await self._yield_loop()
        except Exception as exc:  # a failed step poisons the engine: fail every stream loudly
            logger.exception("engine loop died")
            self.dead = self.dead or exc
            for request_id in list(self.streams):
                self._deliver(request_id, EngineDeadError(f"engine step failed: {exc!r}"))

    async def _yield_loop(self) -> None:
        if self._queue_consumers:
            await asyncio.sleep(STEP_YIELD_S)
            return
        for _ in range(SINK_YIELD_PASSES):
            await asyncio.sleep(0)

    def _deliver(self, request_id: str, item) -> None:
        # Runs between steps, so `item` is not being mutated: a delta taken here is consistent.
        sink = self.streams.get(request_id)
        state = self._deltas.get(request_id)
        if state is not None and isinstance(item, RequestOutput):
            item = delta_output(item, state)
        if sink is not None and item is not None:
            sink(item)

    # ---- introspection -----------------------------------------------------------

    def stats(self):
        return self.engine.core.stats()

    def prefix_summary(self, known_version: int = -1):
        return self.engine.core.prefix_summary(known_version)

    def check_health(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead!r}")
        self.engine.core.executor.check_health()

    def shutdown(self) -> None:
        """Stop the watchdog thread and the loop, then the executor's workers. Nothing of the
        engine runs after this returns (no thread left to touch it while the process exits)."""
        self._stopped.set()
        task = self._loop_task
        if task is not None and not task.done() and not task.get_loop().is_closed():
            task.get_loop().call_soon_threadsafe(task.cancel)  # shutdown may run on any thread
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=5)
        self.engine.core.shutdown()


def _watch(engine_ref, loop_thread: int, stopped: threading.Event) -> None:
    """Watchdog thread: a step that runs past `step_timeout_s` marks the engine dead (health
    checks fail from then on, and every stream fails once the step returns, if it ever does)
    and logs where the loop thread is stuck. Exits with the engine, or at its shutdown."""
    while not stopped.is_set() and (engine := engine_ref()) is not None:
        timeout = engine.engine.config.scheduler.step_timeout_s
        started = engine._step_started
        if engine.dead is None and started is not None and time.monotonic() - started > timeout:
            engine.dead = EngineDeadError("a step has run for more than "
                                          f"step_timeout_s={timeout:g} s (stuck)")
            frame = sys._current_frames().get(loop_thread)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)"
            logger.error("engine step stuck for over %g s; the engine is marked dead. Loop "
                         "thread:\n%s",
                         timeout, stack)
        del engine
        stopped.wait(min(timeout / 4, WATCHDOG_POLL_S))
