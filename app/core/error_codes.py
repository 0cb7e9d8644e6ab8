"""Every `code` a user can see: in an error body (`{"error": {"code": …}}`), a failed job's `error.code`, or a
rejected upload's line report. The README's list of codes is checked against this enum (tests/test_readme.py).

No imports: the library (app/ml) raises some of these too.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # --- requests: the body, its fields and its size ---------------------------------------------------------
    invalid_request = "invalid_request"
    invalid_value = "invalid_value"
    invalid_json = "invalid_json"  # also a line of an upload
    missing_field = "missing_field"  # also a line of an upload
    unknown_field = "unknown_field"  # also a line of an upload
    invalid_cursor = "invalid_cursor"
    request_too_large = "request_too_large"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    http_error = "http_error"
    conflict = "conflict"
    gone = "gone"
    idempotency_key_reused = "idempotency_key_reused"
    # --- authentication and limits -----------------------------------------------------------------------
    missing_api_key = "missing_api_key"
    invalid_api_key = "invalid_api_key"
    invalid_token = "invalid_token"
    rate_limited = "rate_limited"
    too_many_uploads = "too_many_uploads"
    too_many_streams = "too_many_streams"
    too_many_generations = "too_many_generations"
    too_many_sessions = "too_many_sessions"  # Tinker sessions open at once
    too_many_runs = "too_many_runs"  # Tinker training runs held at once
    too_many_requests_in_progress = "too_many_requests_in_progress"  # Tinker requests not finished
    too_many_jobs = "too_many_jobs"
    storage_quota_exceeded = "storage_quota_exceeded"
    # --- files ---------------------------------------------------------------------------------------------
    file_too_large = "file_too_large"
    upload_too_slow = "upload_too_slow"
    invalid_multipart = "invalid_multipart"
    invalid_filename = "invalid_filename"
    invalid_file_type = "invalid_file_type"
    empty_file = "empty_file"
    invalid_file = "invalid_file"
    invalid_file_for_model = "invalid_file_for_model"
    file_not_found = "file_not_found"
    file_in_use = "file_in_use"
    file_format_mismatch = "file_format_mismatch"  # a preference file for a supervised job, or the other way
    file_unavailable = "file_unavailable"  # also a failed job's
    # --- lines of an upload (the rejected upload's report) -------------------------------------------------
    line_too_long = "line_too_long"
    invalid_utf8 = "invalid_utf8"
    invalid_unicode = "invalid_unicode"
    too_deep = "too_deep"
    invalid_type = "invalid_type"
    unknown_format = "unknown_format"
    mixed_formats = "mixed_formats"
    too_many_messages = "too_many_messages"
    invalid_role = "invalid_role"
    invalid_order = "invalid_order"
    empty_content = "empty_content"
    no_assistant_message = "no_assistant_message"
    unsupported_feature = "unsupported_feature"
    invalid_tool = "invalid_tool"
    too_many_tools = "too_many_tools"
    invalid_tool_call = "invalid_tool_call"
    too_many_tool_calls = "too_many_tool_calls"
    undeclared_function = "undeclared_function"
    unanswered_tool_call = "unanswered_tool_call"
    unmatched_tool_result = "unmatched_tool_result"
    # --- models, methods and jobs ----------------------------------------------------------------------------
    model_not_found = "model_not_found"
    model_unavailable = "model_unavailable"  # also a failed job's
    model_exists = "model_exists"
    model_in_use = "model_in_use"
    model_builtin = "model_builtin"
    model_not_deletable = "model_not_deletable"
    no_chat_template = "no_chat_template"  # also a line of an upload
    no_tool_support = "no_tool_support"  # also a line of an upload
    template_error = "template_error"  # a chat template refused a conversation; also a line of an upload
    unsupported_method = "unsupported_method"
    method_mismatch = "method_mismatch"  # a job continues from a fine-tuned model of another method
    unsupported_schema = "unsupported_schema"
    method_unavailable = "method_unavailable"  # also a failed job's
    example_too_long = "example_too_long"
    job_not_cancellable = "job_not_cancellable"
    run_not_cancellable = "run_not_cancellable"  # an eval run that has ended
    job_not_pausable = "job_not_pausable"
    job_not_paused = "job_not_paused"
    job_not_ended = "job_not_ended"
    # --- a failed job's error ----------------------------------------------------------------------------------
    invalid_training_data = "invalid_training_data"
    device_unavailable = "device_unavailable"
    out_of_memory = "out_of_memory"
    queue_unavailable = "queue_unavailable"  # also a 503 at POST /jobs
    worker_lost = "worker_lost"
    internal_error = "internal_error"  # also a 500
    # --- serving -----------------------------------------------------------------------------------------------
    adapter_unavailable = "adapter_unavailable"
    engine_overloaded = "engine_overloaded"
    server_error = "server_error"
    # --- the service's dependencies and keys (admin commands) ------------------------------------------------
    unavailable = "unavailable"
    database_unavailable = "database_unavailable"
    tenant_not_found = "tenant_not_found"
    key_not_found = "key_not_found"
    ambiguous_key_prefix = "ambiguous_key_prefix"
    key_already_revoked = "key_already_revoked"
    # --- webhooks ----------------------------------------------------------------------------------------------
    webhook_url_not_allowed = "webhook_url_not_allowed"
    too_many_webhook_endpoints = "too_many_webhook_endpoints"
    webhook_unreachable = "webhook_unreachable"  # a test delivery got no HTTP answer
