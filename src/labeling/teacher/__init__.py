"""The label stage's VLM teacher over an OpenAI-compatible API, split by job.

  request.py  config, the request body (in the form the server speaks), the answer parsed, errors, tally
  online.py   the online pool: concurrent requests, the retry loop, the shared 429 pause
  batch.py    the Batch API protocol: upload, submit, poll, import, resume after a kill
  client.py   the key, the client, and `teach`, which sends the uncached items online or as batches

The answer cache is a record like the others: src/labeling/answer_cache.py.
"""
