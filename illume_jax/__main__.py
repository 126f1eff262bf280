from illume_jax.cli import run

# The guard matters: Grain's data workers (config.data.num_workers > 0) start by spawning, and a
# spawned child re-imports this module as `__mp_main__`; unguarded, every worker would run the CLI.
if __name__ == "__main__":
    run()
