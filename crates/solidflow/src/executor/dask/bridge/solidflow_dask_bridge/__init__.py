"""solidflow's Dask bridge: a transport between solidflow's Rust Dask executor and Dask.

Dask's client protocol is pickled Python, so the Rust executor drives this package over
JSON lines: requests on stdin, messages on stdout, one JSON object per line; logs go to
stderr. The protocol is documented in docs/dask-bridge.md, its messages are typed in
`protocol`, and both sides check them against tests/fixtures/protocol/*.jsonl.

The bridge only runs commands where Dask places them: the executor decides what runs
when (dependencies, retries, skips, resources). Modules:

- `protocol`: message and request types, reason codes, `BridgeError`.
- `worker`: the code that runs on Dask workers (shipped by value with cloudpickle, so
  workers need `distributed` and nothing solidflow-specific).
- `cluster`: creating or joining a cluster (`connect`).
- `server`: the request loop and the translation of task events into messages.

The Rust crate embeds these files and unpacks them into a content-addressed directory
under the solidflow home; `python -m solidflow_dask_bridge` runs the server.
"""
