"""Wire formats, shared by the services and the executors: kvstore block payloads (kv_payload,
no torch), KV tensors to and from bytes (kv_codec), an engine step as one int64 tensor
(step_wire) and pipeline frames (pipeline_codec). Nothing here is ever unpickled."""
