-- Queue several calls in one call (a caller's submits sent together: see
-- batch.lua), each exactly as submit.lua queues one: in turn, so a batch that
-- would overfill the backlog queues the calls that fit and refuses the rest
-- with TITANBACKLOG.
-- Per call, KEYS and ARGV: submit.lua's. No shared ARGV.
-- Answers, per call, submit.lua's answer: the entry id, or its error.
-- include: submitting
-- include: batch
return each_part(submit)
