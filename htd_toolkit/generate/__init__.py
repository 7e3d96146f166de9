"""Generation: conditioning maps and crop bank from prepared folders → synthetic WebDataset bundles."""

# The flags of the pipeline's num_inference_steps and guidance_scale in `generate` and `generate-slide` (the
# old names --steps and --guidance stay as aliases: htd_toolkit/cli_options.py).
GENERATION_FLAGS = ("--num-inference-steps", "--guidance-scale")
