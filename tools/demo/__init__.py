"""The embedded default: the teacher (import_gguf), the student (make_student), the data (prepare_data, read from
the packages in sources), and the end-to-end demo (run)."""
