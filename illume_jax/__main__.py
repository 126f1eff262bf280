from illume_jax.cli import run

run()
