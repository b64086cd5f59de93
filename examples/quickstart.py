from agent_runtime import BaseAgent, AgentContext, DeltaState

class MyAgent(BaseAgent):
    class State(DeltaState):
        _version = 1
        _entity_type = "my_agent"
        count: int = 0
        history: list[str] = []

    async def on_message(self, ctx: AgentContext, message: dict) -> None:
        ctx.state.count += 1
        ctx.state.history.append(message.get("text", ""))
        msg = await ctx.send_message("")
        await msg.stream_token(f"Hello! You've sent {ctx.state.count} messages.", final=True)
