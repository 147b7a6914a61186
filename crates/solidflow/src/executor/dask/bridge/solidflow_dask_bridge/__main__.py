"""`python -m solidflow_dask_bridge`: serve the bridge protocol on stdin/stdout."""

# The guard matters: worker processes started with multiprocessing's "spawn"
# re-import the main module.
if __name__ == "__main__":
    from solidflow_dask_bridge.server import main

    main()
