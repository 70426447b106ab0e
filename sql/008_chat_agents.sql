-- 008_chat_agents.sql — the agents of the chat and SMS connector kinds (issue 10).
--
-- Adds one row to outbox.agents per new kind, so that applications can address them by code
-- (`api.send_message(null, 'dingbot.agent', …)`, `SELECT id FROM api.agent WHERE code = …`).
-- The daemon routes these agents to the kind of the same name (the registry in
-- src/connector/mod.rs); a DBA may still route any agent elsewhere with `[routes]`.
--
--   kind       agent             delivers to
--   wechat     wechat.agent      WeChat Official Account template messages
--   wecom      wecom.agent       WeCom (企业微信) app messages
--   wecombot   wecombot.agent    WeCom group robot webhooks
--   dingbot    dingbot.agent     DingTalk custom robot webhooks (signed)
--   dingtalk   dingtalk.agent    DingTalk app: work notifications and group chats
--   aliyunsms  aliyunsms.agent   Aliyun SMS SendSms
--   slack      slack.agent       Slack incoming webhooks and chat.postMessage
--   feishu     feishu.agent      Feishu / Lark custom bot webhooks (signed)
--   telegram   telegram.agent    Telegram Bot API sendMessage
--
-- Idempotent: an agent of the same code that a DBA added by hand is kept as it is.

BEGIN;

INSERT INTO outbox.agents (type_code, code, name, description) VALUES
    ('api.agent', 'wechat.agent',    'WeChat',         'WeChat Official Account template messages'),
    ('api.agent', 'wecom.agent',     'WeCom',          'WeCom app messages'),
    ('api.agent', 'wecombot.agent',  'WeCom robot',    'WeCom group robot webhook'),
    ('api.agent', 'dingbot.agent',   'DingTalk robot', 'DingTalk custom robot webhook'),
    ('api.agent', 'dingtalk.agent',  'DingTalk',       'DingTalk app work notifications and group chats'),
    ('api.agent', 'aliyunsms.agent', 'Aliyun SMS',     'Aliyun SMS SendSms'),
    ('api.agent', 'slack.agent',     'Slack',          'Slack incoming webhook and chat.postMessage'),
    ('api.agent', 'feishu.agent',    'Feishu',         'Feishu / Lark custom bot webhook'),
    ('api.agent', 'telegram.agent',  'Telegram',       'Telegram Bot API sendMessage')
ON CONFLICT (code) DO NOTHING;

INSERT INTO outbox.schema_migrations (version, name) VALUES (8, 'chat_agents');

COMMIT;
