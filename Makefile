# The two commands a fresh clone needs: `make demo` and `make test` (each sets up first).
PY := .venv/bin/python

.PHONY: setup demo test bench bench-peers clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m streamsink.serving.cli demo

test: setup
	$(PY) -m pytest tests -n 2 --dist loadfile --durations=25

bench: setup
	$(PY) benchmarks/decode_latency.py
	$(PY) benchmarks/ppl_speed.py
	$(PY) benchmarks/latency_vs_cache.py
	$(PY) benchmarks/perplexity.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/many_streams.py
	$(PY) benchmarks/dtype_cost.py
	$(PY) benchmarks/ray_serve.py
	$(PY) benchmarks/batch_throughput.py
	$(PY) benchmarks/load.py
	$(PY) benchmarks/chat_session.py

# streamsink against llama.cpp's llama-server (context shift) on this machine; builds llama.cpp
# once into the cache. Not part of `bench` or `test`. BENCH_ARGS=--quick for the smoke run.
bench-peers: setup
	nice -n 10 $(PY) benchmarks/peer_llamacpp.py $(BENCH_ARGS)

clean:
	rm -rf .venv
