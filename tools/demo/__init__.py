"""The embedded default: the teacher (import_gguf), the student (make_student), the data (prepare_data), and
the end-to-end demo (run)."""
