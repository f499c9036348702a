# The two commands a fresh clone needs: `make demo` and `make test` (each sets up first).
PY := .venv/bin/python

.PHONY: setup demo test bench bench-peers soak docs clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m streamsink.serving.cli demo

test: setup
	$(PY) -m pytest tests -n 2 --dist loadfile --durations=25

# Every benchmark docs/benchmarks.md shows, with the settings it states (hours on 2 cores; each
# script also runs alone). Each run adds a file under benchmarks/results/<name>/; `make docs`
# then renders the latest ones into README.md, docs/benchmarks.md and docs/img/.
bench: setup
	$(PY) benchmarks/decode_latency.py --steps 64 --rounds 5
	STREAMSINK_NATIVE_SHADOWS=0 $(PY) benchmarks/decode_latency.py --steps 64
	$(PY) benchmarks/shadow_cost.py --steps 40
	$(PY) benchmarks/latency_vs_cache.py
	$(PY) benchmarks/many_streams.py
	$(PY) benchmarks/load.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/memory.py --tokens 1000000 --decode 1000 --streaming-only --text katrine-14263.txt
	$(PY) benchmarks/perplexity.py --stride 64
	$(PY) benchmarks/ppl_speed.py
	$(PY) benchmarks/passkey.py
	$(PY) benchmarks/chat_session.py
	$(PY) benchmarks/dtype_cost.py
	$(PY) benchmarks/batch_throughput.py
	$(PY) benchmarks/batch_resume_check.py
	$(PY) benchmarks/ray_serve.py

# Tables and plots of the docs from the committed results (no engine; seconds).
docs: setup
	$(PY) benchmarks/report.py

# streamsink against llama.cpp's llama-server (context shift) on this machine; builds llama.cpp
# once into the cache. Not part of `bench` or `test`. BENCH_ARGS=--quick for the smoke run (never
# shown by `make docs`, which renders the latest full run into docs/peer_llamacpp.md).
bench-peers: setup
	nice -n 10 $(PY) benchmarks/peer_llamacpp.py $(BENCH_ARGS)

# Hours of mixed load on one server with Prometheus watching, then the leak and slowdown checks
# (docs/soak.md). Not part of `bench` or `test`; SOAK_ARGS pass through (e.g. --duration).
soak: setup
	$(PY) benchmarks/soak.py $(SOAK_ARGS)

clean:
	rm -rf .venv
