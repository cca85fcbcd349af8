"""Tests of the .dsv language (dsl/ and the check, fmt and import-hf commands)."""
