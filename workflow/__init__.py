"""Everything around a run: which schedule it uses and the compression_rate.json files
(`run_schedule`, `schedule_file`), its folders, checkpoints and release files (`runs`), and what is
made of its results: paired statistics (`stats`), figures (`figures`), ONNX graphs (`onnx_export`)
and timing (`timing`)."""
